"""fqtrun report: runs and sweeps -> grouped table (markdown, csv, terminal), PNG plots, one HTML page.

collect.py finds and reads runs and groups them; tables.py computes the statistics and writes
the table; plots.py draws the figures; html.py puts it all on one static page.
"""
