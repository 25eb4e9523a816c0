from cnllm.cli.app import main

main()
