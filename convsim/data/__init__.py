"""Chat data: the conversation schema, importers for each export format, cleaning and training examples."""
