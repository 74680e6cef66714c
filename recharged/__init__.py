"""recharged: prepaid balance and auto-recharge daemon."""

__version__ = "0.1.0"
