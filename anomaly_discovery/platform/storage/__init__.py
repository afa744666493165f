"""Persistence: SQL store and its migrations, FAISS index, embedding file, paths."""
