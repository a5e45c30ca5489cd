"""One module per pipeline stage; each registers its subcommands with `export.commands.registry.command`."""
