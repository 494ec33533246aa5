"""The browser client's built bundle (``static/``), made from ``web/`` by
``npm run build`` (or ``tox -e web``) and served by cellmux.server.pages."""
