terraform {
  # 1.5: check blocks and lifecycle preconditions used below.
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 5.40: security groups on Network Load Balancers and the
      # aws_vpc_security_group_{ingress,egress}_rule resources are both well settled by then.
      version = ">= 5.40, < 7.0"
    }
  }
}
