"""Runtime room: the composition root - wiring (Runtime), the supervisor behind `mailflow up`,
the list of every projection, and the demo. The only room that knows every other."""
