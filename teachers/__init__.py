"""ensc.teachers"""
