//! Provider definitions (to come).
