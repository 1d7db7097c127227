"""Operations: logs, metrics, health and the status page."""
