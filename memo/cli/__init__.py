"""memo's command line: one file per subcommand (``*_command_parser`` / ``*_command``)."""
