"""The Ray Serve application: OpenAI ingress, request router, app builder, settings."""
