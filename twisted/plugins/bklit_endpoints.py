"""Endpoint string plugin: ``reuseport:PORT`` (see ``bklit.endpoints``)."""

from bklit.endpoints import ReusePortParser

reuseport = ReusePortParser()
