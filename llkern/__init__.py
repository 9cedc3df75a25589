"""llkern"""
