"""convsim: turn a chat history into a fine-tuned model that continues the conversation as any of
its people, and the tools to chat with it, steer it, attribute it and measure it.

Run `convsim --help` for the commands; shared design notes live in the repository's docs/.
"""

__version__ = "0.1.0"
