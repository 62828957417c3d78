"""The whole stack on one machine (``cpl up``) and its command-line clients (``cpl submit``, ``cpl export``)."""
