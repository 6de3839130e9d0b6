"""Ladder adaptation: conversion and distillation on Ray Train."""
