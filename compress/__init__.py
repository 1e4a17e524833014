"""ensc.compress"""
