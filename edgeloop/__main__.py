from edgeloop.cli.main import main

main()
