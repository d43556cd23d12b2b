"""Delta forms (how a method changes a weight) and the TaskDelta file that stores the change."""
