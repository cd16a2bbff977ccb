"""Tools for watching a run: a headless-Chromium driver (``chromium``), a local Ray + Prometheus stack
(``stack``), the Grafana dashboard's panels rendered from Prometheus into one PNG (``panels``) and the command that
makes the README's pictures from a short demo run (``python -m monitoring.snapshot``). The dashboard itself:
``grafana/uniar.json``."""
