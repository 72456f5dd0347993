"""`renderflow trace-report`: latency, phase, error and waterfall reports from OTLP-JSON span files."""
