from cnllm.cli.app import main

if __name__ == "__main__":  # not when a spawned child process (quantize) imports it
    main()
