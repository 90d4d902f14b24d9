"""The web pages served at /ui (api/routers/ui.py): static HTML, CSS and ES modules, no build step; the one
JavaScript library they use (Chart.js) is vendored, pinned, in static/vendor/ with its license."""
