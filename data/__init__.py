"""ensc.data"""
