"""The batch jobs behind the CLI verbs: detect, discover, evaluate, publish, demo."""
