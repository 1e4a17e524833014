"""ensc.export"""
