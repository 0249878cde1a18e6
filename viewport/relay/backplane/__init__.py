"""Cross-relay backplanes: each module provides one IBackplane implementation."""
