"""A web page to try any vocabulary on your own images: ``python tools/web_demo.py`` (Gradio, offline).

``ovd.app.models`` loads the served models once and caches text embeddings per (model, vocabulary);
``ovd.app.inputs`` checks uploads and vocabularies; ``ovd.app.handlers`` runs the page's actions without
any web framework; ``ovd.app.page`` is the Gradio layout and launch (``pip install 'ovd[web]'``).
"""
