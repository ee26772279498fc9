"""The web dashboard: server-rendered page shells that read the JSON API from the browser.

Pages carry no job data: each is a shell whose scripts fetch ``/api/v1`` with the
``bocompress_token`` cookie (read access only), so the API's per-owner visibility is the
single place that decides what a browser may see.
"""
