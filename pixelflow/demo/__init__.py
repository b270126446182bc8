"""The web demo: the gradio-free model service and the gradio page on top of it."""
