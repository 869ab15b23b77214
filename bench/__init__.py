"""Speed, overhead, memory and transfer sizes of fl-covid, measured side by side (bench/README.md)."""
