"""The review loop: store, index and embeddings kept consistent under reviewer actions."""
