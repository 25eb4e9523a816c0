"""The command-line shell: root app, shared options, rendering and error mapping."""
