"""TorchRL policy server. Process-wide settings are made by ``service.process.configure_process``."""
