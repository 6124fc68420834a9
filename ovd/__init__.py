"""ovd: open-vocabulary object detection."""
