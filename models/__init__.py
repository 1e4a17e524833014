"""ensc.models"""
