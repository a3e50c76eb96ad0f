"""Reports across finished runs: the steering dose-response (:mod:`.steering`)."""
