"""One module per subcommand: parse and validate options, call core, render the result."""
