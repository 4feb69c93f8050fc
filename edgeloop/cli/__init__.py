"""The one `edgeloop` command. Subcommands live in their own modules, imported on use."""
