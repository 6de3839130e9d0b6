"""Ray Serve: the OpenAI-compatible ingress and deployments (see DESIGN.md, Serve)."""
