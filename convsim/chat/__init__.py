"""The commands people talk through: `convsim chat`, `reply`, `converse` and the saved-conversation history."""
