"""The Gradio chat page for any `model_runtime.protocol.ChatBackend`.

ui.py builds the page and its events, conversation.py runs one turn against the backend (and
cancels it), render.py makes message text safe to show and export, i18n.py holds the English and
Chinese texts, hf_spaces.py knows about Hugging Face Spaces and ZeroGPU. Importing this package
is cheap (no Gradio, no torch) so that `python app.py --help` stays fast.
"""
