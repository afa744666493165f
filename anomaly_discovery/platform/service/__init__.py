"""The HTTP service: Ray Serve deployment, FastAPI routes, schemas and I/O."""
