mod cache;
mod corpus;
mod partition;
mod scenario;
