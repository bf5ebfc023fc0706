"""Tool catalogues, query records, benchmark loaders, doc rendering and tokenisation."""
