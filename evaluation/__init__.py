"""ensc.evaluation"""
