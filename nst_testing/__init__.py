"""Helpers that tests/, bench/ and scripts/ share: paths, manifests, fake faults, SeaweedFS and Prefect processes.

Never imported by the product (nst/, flows/). Importing this package imports nothing else: each module brings its own.
"""
