"""ensc.cli"""
