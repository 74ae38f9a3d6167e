"""The Prefect objects of this project (setup.py: `make prefect-setup`); a package so that `deploy.setup` imports."""
