"""CPL: Critical Planning Step Learning as a pure library (no HTTP, no Redis)."""
