"""Reward models and rules, one file per reward (ocr, geneval, preference, judge, programmatic), plus the router that
routes samples by task and combines the rewards with weights. ``actors/reward_models.py`` runs them on Ray."""
from rewards.base import RewardBatch, RewardModel, RewardOutput, RewardScores
from rewards.router import RewardRouter, RoutedScores, build_reward, build_router

__all__ = ["RewardBatch", "RewardModel", "RewardOutput", "RewardScores", "RewardRouter", "RoutedScores",
           "build_reward", "build_router"]
