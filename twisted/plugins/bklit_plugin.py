"""twistd plugin: ``twistd bklit`` runs the bklit ingestion daemon."""

from twisted.application.service import ServiceMaker

bklit = ServiceMaker(
    "bklit",
    "bklit.tap",
    "Real-time ingestion server for privacy-friendly web analytics",
    "bklit",
)
