"""fl-covid: federated, privacy-preserving COVID-19 CT classification across hospitals."""

__version__ = "0.1.0"
